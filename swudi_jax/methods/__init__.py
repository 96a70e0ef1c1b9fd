"""One module per merging method; each is a pure function of a stack of task vectors."""
