"""The co-located node: RolloutService and TrainerService in one process, on one
in-memory base model, with new adapter versions handed to rollout as in-memory
references (``mem://<node>/<adapter>/<version>``). See :mod:`lorafleet.node.app`
(wiring) and :mod:`lorafleet.node.memory` (what is shared and what is copied)."""
