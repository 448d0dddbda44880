"""The built-in tasks served over ``lorafleet.environment.v1.EnvironmentService``.

The scheduler runs built-in tasks in-process; this service exists so that the
same tasks can be reached by address, and as the reference implementation for
other systems that plug their own environments in.
"""
