"""Stage 4, whole models as pytrees: flat path views, leaf rules and plans (``layout``),
grouping same-shape leaves into one vmapped call and ``merge`` (``merger``), layer-wise
merging (``sequential``) and calibration capture (``calibration``)."""

__all__: list[str] = []  # a namespace of submodules, each imported by its own path
