"""Packs: several students of one architecture trained at once as one wide network.

Submodules, each importing only those listed before it:

- ``plan``: which trials may share a pack (pure: no torch, no Ray);
- ``memory``: how many students fit in a pack: the memory budget and a student's bytes;
- ``wide``: the students' layers side by side, as one network;
- ``optim``: each student's own optimizer over the wide parameters;
- ``members``: teacher members trained fused, each fed its own batches;
- ``streams``: a pack's streams, each with its own data and batches, and their teachers as one network;
- ``run``: ``run_pack``, the students of one pack from data to result rows.
"""

from kd_ray.packs.plan import PACK_MODES, plan_packs

__all__ = ["PACK_MODES", "plan_packs"]
