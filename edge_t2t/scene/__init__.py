"""Scenes: large georeferenced images cut into chips, indexed and searched by place."""
