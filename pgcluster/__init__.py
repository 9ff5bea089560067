"""What a PostgreSQL cluster's nodes are right now, and which one leads: read by the cluster
probes and by the failover, rejoin and switchover actions (a leaf: it imports none of them)."""
