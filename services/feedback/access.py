"""The feedback service's calls, gRPC and HTTP, and the role each needs (any other call is
refused to every key)."""

from plaudit.services.common.security.guard import CallRoles

CALL_ROLES: CallRoles = {
    "/plaudit.v1.FeedbackService/SubmitComparison": "submit_feedback",
    "/plaudit.v1.FeedbackService/SubmitRanking": "submit_feedback",
    "/plaudit.v1.FeedbackService/SubmitRating": "submit_feedback",
    "/plaudit.v1.FeedbackService/SubmitCorrection": "submit_feedback",
    "/plaudit.v1.FeedbackService/SubmitBatch": "submit_feedback",
    "/plaudit.v1.FeedbackService/ExportPreferences": "read_feedback",
    "/plaudit.v1.FeedbackService/GetStats": "read_feedback",
}
ROUTE_ROLES: CallRoles = {  # the JSON API (plaudit.services.feedback.http): METHOD /route
    "POST /api/v1/comparisons": "submit_feedback",
    "POST /api/v1/rankings": "submit_feedback",
    "POST /api/v1/ratings": "submit_feedback",
    "POST /api/v1/corrections": "submit_feedback",
    "POST /api/v1/tasks": "submit_feedback",
    "GET /api/v1/tasks/next": "submit_feedback",
    "GET /api/v1/tasks/{task_id}": "submit_feedback",
    "POST /api/v1/tasks/{task_id}/skip": "submit_feedback",
    "GET /api/v1/stats": "read_feedback",
}
