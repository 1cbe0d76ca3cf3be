"""Evaluations run as assets over the chain's outputs: mislabel detection, further training, graph noise."""
