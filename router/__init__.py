"""Floor 2: routing math over frozen features (statistics, gates, OOD detection, fusion layers)."""
