output "sqs_queue_url" {
  description = "URL of the SQS queue (TRANSFER_WORKER_QUEUE on EKS)."
  value       = aws_sqs_queue.events.url
}

output "sqs_queue_arn" {
  description = "ARN of the SQS queue, for whatever reads its depth (KEDA's aws-sqs-queue scaler needs sqs:GetQueueAttributes on it)."
  value       = aws_sqs_queue.events.arn
}

output "sqs_dead_letter_queue_url" {
  description = "URL of the SQS dead-letter queue (TRANSFER_WORKER_DEAD_LETTER on EKS)."
  value       = aws_sqs_queue.dead_letter.url
}

output "worker_role_arn" {
  description = "ARN of the worker's IAM role (eks.amazonaws.com/role-arn annotation on EKS, TRANSFER_WORKER_AWS_ROLE_ARN on GKE)."
  value       = aws_iam_role.worker.arn
}

output "gcp_service_account_email" {
  description = "Email of the worker's Google service account (iam.gke.io/gcp-service-account annotation, impersonation URL of the external_account file)."
  value       = google_service_account.worker.email
}

output "gcp_service_account_unique_id" {
  description = "Unique id of the worker's Google service account (the accounts.google.com:sub the IAM role trusts)."
  value       = google_service_account.worker.unique_id
}

output "workload_identity_provider_name" {
  description = "Full name of the AWS workload identity provider (projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/aws); the external_account audience is //iam.googleapis.com/ followed by it."
  value       = google_iam_workload_identity_pool_provider.aws.name
}

output "workload_identity_eks_provider_name" {
  description = "Full name of the EKS OIDC workload identity provider used by deploy/k8s/overlays/aws, or null when var.eks_oidc_provider_arn is not set."
  value       = one(google_iam_workload_identity_pool_provider.eks[*].name)
}

output "pubsub_subscription_path" {
  description = "Path of the Pub/Sub subscription (TRANSFER_WORKER_QUEUE on GKE)."
  value       = google_pubsub_subscription.events.id
}

output "pubsub_dead_letter_topic_path" {
  description = "Path of the Pub/Sub dead-letter topic (TRANSFER_WORKER_DEAD_LETTER on GKE)."
  value       = google_pubsub_topic.dead_letter.id
}

output "pubsub_topic_path" {
  description = "Path of the Pub/Sub topic producers publish events to."
  value       = google_pubsub_topic.events.id
}

output "s3_source_buckets" {
  description = "Names of the S3 source buckets."
  value       = [for b in var.aws_source_buckets : aws_s3_bucket.transfer[b].id]
}

output "s3_destination_buckets" {
  description = "Names of the S3 destination buckets."
  value       = [for b in var.aws_destination_buckets : aws_s3_bucket.transfer[b].id]
}

output "gcs_source_buckets" {
  description = "Names of the GCS source buckets."
  value       = [for b in var.gcs_source_buckets : google_storage_bucket.transfer[b].name]
}

output "gcs_destination_buckets" {
  description = "Names of the GCS destination buckets."
  value       = [for b in var.gcs_destination_buckets : google_storage_bucket.transfer[b].name]
}

output "allowed_buckets" {
  description = "Value for TRANSFER_WORKER_ALLOWED_BUCKETS covering every bucket created here."
  value = join(",", concat(
    [for b in concat(var.aws_source_buckets, var.aws_destination_buckets) : "aws_s3:${b}"],
    [for b in concat(var.gcs_source_buckets, var.gcs_destination_buckets) : "gcp_gcs:${b}"],
  ))
}
