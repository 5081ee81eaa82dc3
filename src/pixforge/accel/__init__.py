"""Training-free acceleration: feature caching (cache.py) and its schedule search (ecad.py)."""
