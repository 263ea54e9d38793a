"""Pure-torch building blocks of DiffusionInst: box ops, diffusion schedule, dynamic mask head, matcher, losses."""
