"""Interventions: edit hooks on named points, expert ablation / forcing / scaling, the logit lens, and the causal
specialisation measurement (docs in each module; the point names in ``smallthinker_lab.model.hooks.HOOK_POINTS``).

    with sl.intervene(model, ablate={3: [5, 9]}):
        sl.generate(model, ids)
"""

from ..model.hooks import HOOK_POINTS, hook_names, hook_points_table
from .edit import hooks, resolve_names
from .intervene import ABLATE_MODES, InterventionError, intervene
from .lens import logit_lens
from .specialisation import SpecialisationResult, causal_specialisation

__all__ = ["ABLATE_MODES", "HOOK_POINTS", "InterventionError", "SpecialisationResult", "causal_specialisation",
           "hook_names", "hook_points_table", "hooks", "intervene", "logit_lens", "resolve_names"]
