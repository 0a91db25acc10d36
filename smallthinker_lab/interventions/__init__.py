"""Interventions: edit hooks on named points, expert ablation / forcing / scaling, the logit lens, and the causal
specialisation measurement (docs in each module; the point names in ``smallthinker_lab.model.hooks.HOOK_POINTS``).

    with sl.intervene(model, ablate={3: [5, 9]}):
        sl.generate(model, ids)

    traces = record_routing(model, [ids], 8)            # routing per position and layer, replayed elsewhere
    with replay(engine, traces[0].for_shape(engine.config)):
        engine.generate(ids, 8)
"""

from ..model.hooks import HOOK_POINTS, hook_names, hook_points_table
from .edit import hooks, resolve_names
from .intervene import ABLATE_MODES, InterventionError, intervene
from .lens import logit_lens
from .replay import RoutingTrace, record_routing, replay
from .specialisation import SpecialisationResult, causal_specialisation

__all__ = ["ABLATE_MODES", "HOOK_POINTS", "InterventionError", "SpecialisationResult", "causal_specialisation",
           "hook_names", "hook_points_table", "hooks", "intervene", "logit_lens", "record_routing", "replay",
           "resolve_names", "RoutingTrace"]
