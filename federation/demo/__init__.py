"""The federation demo (`appliance demo federation`), its data, and simulated silos (`appliance sim`)."""
