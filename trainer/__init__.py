"""Offline training and export: turns feedback into reward-model and policy versions.

Imported as ``plaudit.trainer``; the folder's bare name is refused so that no module is ever
loaded twice under two names.
"""

if __name__ != "plaudit.trainer":
    raise ImportError(f"import plaudit.trainer, not {__name__}")
