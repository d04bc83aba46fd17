"""AI lead distribution: leads without an owner device go to the online devices most likely to deliver and get a
reply (Thompson sampling over each device's recent record), a per-device limit spreading them; every campaign
keeps a report explaining each device's share. See `plugin.py` for the options and the report."""
