"""Settings: the one typed configuration (`settings`) and the network presets (`presets`)."""
