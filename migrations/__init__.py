"""Alembic migrations, shipped as a package so `finetune migrate` works from an install."""
