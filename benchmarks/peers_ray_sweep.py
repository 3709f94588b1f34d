"""Ray Data LLM's `batch_size` x `max_concurrent_batches` on the heavy-tailed rows: the
sweep behind peers_ray.RAY_BEST (opt-in: `run.py --only peers_ray_sweep`)."""

from peers_ray import sweep as run

__all__ = ["run"]
