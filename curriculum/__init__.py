"""Seed knowledge graph, neighbourhoods, frontier, curiosity and traversal samplers (issues 3-4)."""
