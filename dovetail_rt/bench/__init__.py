"""`dovetail bench`: dovetail_rt side by side with the tools a user would pick instead."""
