"""Local stand-ins for the outside systems (Konnect, Google) for runs and tests.

For now each answers its health probe and a problem+json 404 for every provider path; later work
gives them the providers' real wire behaviour (/work/shared/reference/providers.md).
"""
