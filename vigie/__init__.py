"""Vigie, the application: the `vigie` command line and the runner that starts the fronts."""
