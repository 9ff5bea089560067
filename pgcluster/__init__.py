"""What a PostgreSQL cluster's nodes are right now, which one leads, and whether the shop's data
keeps its invariants: read by the probes, the drills and the actions (a leaf: it imports none
of them)."""
