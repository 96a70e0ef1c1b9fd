"""Stage 4, whole models as pytrees: flat path views, leaf rules and plans (``layout``),
grouping same-shape leaves into one vmapped call and ``merge`` (``merger``), layer-wise
merging (``sequential``) and calibration capture (``calibration``)."""
