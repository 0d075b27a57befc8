"""Cost of a token: power meters (energy.py) and TCO arithmetic (tco.py). Pure Python."""
