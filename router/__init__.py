"""The tidegate router: cache → edge (+ confidence) → escalate to the cloud.

Entry points for the CLI live in ``router.service`` (``build_router``,
``serve_router``); the YAML shape is ``router.settings.RouterSettings``.
"""
