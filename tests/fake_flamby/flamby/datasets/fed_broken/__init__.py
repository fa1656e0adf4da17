"""A dataset whose optional dependency is missing: importing it fails."""

import a_package_that_is_not_installed  # noqa: F401
