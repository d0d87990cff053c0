"""Alembic migrations of the relational store; run them with `smartcover db upgrade`."""
