"""`@step(name)`: the one way a component wrapper is declared.

Every step runs in its own image (components.images), which bakes the project in, so nothing
is pip-installed when a task starts. Inside a running task KFP sets ``_KFP_RUNTIME=true`` and
``kfp.dsl`` has no decorators; the wrapper is then left a plain function so the module (which
also holds the step's plain-Python core) still imports.
"""

from kfp import dsl

from components.images import image


def step(name: str):
    if not hasattr(dsl, "component"):  # executing inside a task
        return lambda func: func
    return dsl.component(base_image=image(name), install_kfp_package=False)
