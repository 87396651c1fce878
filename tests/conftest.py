"""Hypothesis profiles: CI draws the same examples every run (derandomize) so a red run is reproducible."""
import os

from hypothesis import settings

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
