"""Retention gates: the gate modules (TrimKV per layer, DBTrimKV shared projection), our
checkpoint format, the authors' importer, and loading either for a served model."""
