"""Independent references written from the papers' and official code's equations.

They never import storm_hf: parity tests compare the package against these.
"""
