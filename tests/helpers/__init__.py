"""Builders of tiny random models shared by the tests (import as `helpers.<module>`)."""
