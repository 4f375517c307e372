"""Offline training and export: turns feedback into reward-model and policy versions."""
