"""List formats, the compact domain matcher and the list updater (the bottom layer: imports nothing of Vigie)."""
