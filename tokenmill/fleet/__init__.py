"""Many instances behind one endpoint: the fleet's configuration (config.py), each instance's
memory need (needs.py); the router, supervisor and Ray replicas build on these."""
