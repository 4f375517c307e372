"""Plaudit's services (reward, feedback, generation) and the plumbing they share.

Imported as ``plaudit.services``; the folder's bare name is refused so that no module is ever
loaded twice under two names.
"""

if __name__ != "plaudit.services":
    raise ImportError(f"import plaudit.services, not {__name__}")
