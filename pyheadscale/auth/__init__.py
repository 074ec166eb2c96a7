"""Credentials: pre-auth keys, API keys, and the interactive (web/OIDC) registration flow."""
