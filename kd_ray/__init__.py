"""kd_ray: knowledge-distillation fidelity studies on Ray Tune.

Heavy dependencies (torch, ray) are imported by the modules that need them, so
``import kd_ray.analysis`` works on a machine with pandas alone.
"""

__version__ = "0.1.0"
