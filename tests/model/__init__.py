"""Model-based tests: a pure-Python reference ledger, compared with the store by hypothesis."""
