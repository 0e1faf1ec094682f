"""magasin's generic runtime. It never imports ``actors`` (tests/unit/test_layering.py)."""
