"""FMEL (field-level market explainability) analyzer, access tracking and decision sinks."""
