"""Code generation: memory plan, weight storage, Jinja2 rendering of the C project."""
