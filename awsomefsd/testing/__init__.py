"""Test support that ships with the package so cluster tests over real processes can reuse it."""
