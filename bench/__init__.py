"""Benchmarks of cimext: ``suite`` (what ``cimext bench`` runs), the shared ``timing`` code and one
``bench_<op>.py`` per op or study (pytest-benchmark cases or scripts printing a table)."""
