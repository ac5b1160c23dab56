"""Built-in topology-update components."""

#: plugin modules of this package, registered in this order
MODULES: tuple[str, ...] = ("static", "set", "rigl", "dsr", "mest", "itop", "granet", "snfs")
