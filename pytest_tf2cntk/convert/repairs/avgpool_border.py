"""Repair: AveragePool whose window overhangs the map with SAME padding (placeholder)."""
