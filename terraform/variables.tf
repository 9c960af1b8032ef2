# ---------------------------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------------------------

variable "worker_namespace" {
  description = "Kubernetes namespace the worker runs in (deploy/k8s uses transfer-worker)."
  type        = string
  default     = "transfer-worker"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.worker_namespace))
    error_message = "worker_namespace must be a valid Kubernetes namespace name."
  }
}

variable "worker_service_account" {
  description = "Kubernetes service account of the worker pods (deploy/k8s uses transfer-worker-sa)."
  type        = string
  default     = "transfer-worker-sa"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", var.worker_service_account))
    error_message = "worker_service_account must be a valid Kubernetes service account name."
  }
}

variable "sqs_max_receive_count" {
  description = "maxReceiveCount of the SQS redrive policy: receives of one message before SQS moves it to the dead-letter queue. Must exceed the worker's --max-retries (3) + 1."
  type        = number
  default     = 5

  validation {
    condition     = var.sqs_max_receive_count > 4 && var.sqs_max_receive_count <= 1000 && floor(var.sqs_max_receive_count) == var.sqs_max_receive_count
    error_message = "sqs_max_receive_count must be a whole number from 5 to 1000 (it must exceed the worker's max retries 3 + 1)."
  }
}

variable "pubsub_max_delivery_attempts" {
  description = "max_delivery_attempts of the Pub/Sub dead_letter_policy: deliveries of one message before Pub/Sub forwards it to the dead-letter topic. Must exceed the worker's --max-retries (3) + 1."
  type        = number
  default     = 5

  validation {
    condition     = var.pubsub_max_delivery_attempts > 4 && var.pubsub_max_delivery_attempts <= 100 && floor(var.pubsub_max_delivery_attempts) == var.pubsub_max_delivery_attempts
    error_message = "pubsub_max_delivery_attempts must be a whole number from 5 to 100 (Pub/Sub's maximum; it must exceed the worker's max retries 3 + 1)."
  }
}

variable "visibility_timeout_seconds" {
  description = "SQS visibility timeout and Pub/Sub ack deadline in seconds; matches the worker's --visibility-timeout (300), which the worker extends every third of it while a transfer runs."
  type        = number
  default     = 300

  validation {
    condition     = var.visibility_timeout_seconds >= 10 && var.visibility_timeout_seconds <= 600
    error_message = "visibility_timeout_seconds must be between 10 and 600 (the Pub/Sub ack deadline maximum)."
  }
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Days after initiation when the bucket lifecycle aborts an incomplete multipart upload (S3; XML-API uploads on GCS). It also aborts uploads still running, so it must exceed the longest a transfer can hold its message: SQS caps visibility at 12 hours, the worker's Pub/Sub lease at 2 hours."
  type        = number
  default     = 1

  validation {
    condition     = var.abort_incomplete_multipart_upload_days >= 1 && var.abort_incomplete_multipart_upload_days <= 365 && floor(var.abort_incomplete_multipart_upload_days) == var.abort_incomplete_multipart_upload_days
    error_message = "abort_incomplete_multipart_upload_days must be a whole number from 1 to 365."
  }
}

# ---------------------------------------------------------------------------------------------
# AWS
# ---------------------------------------------------------------------------------------------

variable "aws_region" {
  description = "AWS region for the S3 buckets and SQS queues."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.aws_region))
    error_message = "aws_region must look like us-east-1."
  }
}

variable "aws_source_buckets" {
  description = "Names of the S3 buckets the worker reads from (s3:GetObject; s3:ListBucket too with s3_list_source_buckets). Created by this module."
  type        = list(string)

  validation {
    condition     = length(var.aws_source_buckets) > 0 && alltrue([for b in var.aws_source_buckets : can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", b))])
    error_message = "aws_source_buckets needs at least one valid S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)."
  }
}

variable "aws_destination_buckets" {
  description = "Names of the S3 buckets the worker writes to (s3:PutObject, s3:AbortMultipartUpload, s3:ListMultipartUploadParts; s3:GetObject and s3:ListBucket for the idempotency check). Created by this module."
  type        = list(string)

  validation {
    condition     = length(var.aws_destination_buckets) > 0 && alltrue([for b in var.aws_destination_buckets : can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", b))])
    error_message = "aws_destination_buckets needs at least one valid S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)."
  }
}

variable "s3_list_source_buckets" {
  description = "Grant s3:ListBucket on the source buckets (beyond the contract's permissions). S3 then answers a missing source object with 404 and the worker dead-letters it as source_not_found; without it S3 answers 403 and the reason is access_denied. Costs: the worker can list every key of the source buckets."
  type        = bool
  default     = false
}

variable "s3_abort_orphan_uploads" {
  description = "Grant s3:ListBucketMultipartUploads on the destination buckets (beyond the contract's permissions), so the next attempt at a key aborts the multipart upload a killed worker left behind. Without it the worker skips that step and the lifecycle rule (abort_incomplete_multipart_upload_days) removes the parts."
  type        = bool
  default     = false
}

variable "s3_kms_key_arn" {
  description = "ARN of the KMS key the worker encrypts S3 destination objects with (--s3-kms-key-id). When set, the worker's role gets kms:GenerateDataKey and kms:Decrypt on this key only (SSE-KMS writes need both: multipart parts are encrypted with a data key); null grants nothing."
  type        = string
  default     = null

  validation {
    condition     = var.s3_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/.+$", var.s3_kms_key_arn))
    error_message = "s3_kms_key_arn must be null or a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)."
  }
}

variable "s3_sse_algorithm" {
  description = "Default S3 encryption: aws:kms (the AWS managed aws/s3 key, usable by the worker without kms:* permissions) or AES256 (SSE-S3)."
  type        = string
  default     = "aws:kms"

  validation {
    condition     = contains(["aws:kms", "AES256"], var.s3_sse_algorithm)
    error_message = "s3_sse_algorithm must be aws:kms or AES256."
  }
}

variable "s3_noncurrent_version_expiration_days" {
  description = "Days after which non-current object versions (left by overwrites) are deleted from the S3 buckets."
  type        = number
  default     = 30

  validation {
    condition     = var.s3_noncurrent_version_expiration_days >= 1
    error_message = "s3_noncurrent_version_expiration_days must be at least 1."
  }
}

variable "sqs_queue_name" {
  description = "Name of the SQS queue the worker consumes (TRANSFER_WORKER_QUEUE is its URL)."
  type        = string
  default     = "transfer-events"

  validation {
    condition     = can(regex("^[A-Za-z0-9_-]{1,80}$", var.sqs_queue_name))
    error_message = "sqs_queue_name must be 1-80 letters, digits, hyphens or underscores."
  }
}

variable "sqs_dead_letter_queue_name" {
  description = "Name of the SQS dead-letter queue (TRANSFER_WORKER_DEAD_LETTER is its URL)."
  type        = string
  default     = "transfer-events-dlq"

  validation {
    condition     = can(regex("^[A-Za-z0-9_-]{1,80}$", var.sqs_dead_letter_queue_name))
    error_message = "sqs_dead_letter_queue_name must be 1-80 letters, digits, hyphens or underscores."
  }
}

variable "sqs_message_retention_seconds" {
  description = "How long the main SQS queue keeps an unconsumed message (the dead-letter queue always keeps 14 days)."
  type        = number
  default     = 345600

  validation {
    condition     = var.sqs_message_retention_seconds >= 60 && var.sqs_message_retention_seconds <= 1209600
    error_message = "sqs_message_retention_seconds must be between 60 and 1209600 (14 days)."
  }
}

variable "aws_role_name" {
  description = "Name of the worker's IAM role (TRANSFER_WORKER_AWS_ROLE_ARN on GKE, the eks.amazonaws.com/role-arn annotation on EKS)."
  type        = string
  default     = "transfer-worker"

  validation {
    condition     = can(regex("^[A-Za-z0-9+=,.@_-]{1,64}$", var.aws_role_name))
    error_message = "aws_role_name must be a valid IAM role name (1-64 characters)."
  }
}

variable "aws_role_audience" {
  description = "Audience of the Google-signed ID token the worker on GKE presents to AWS STS (the worker's --aws-role-audience)."
  type        = string
  default     = "sts.amazonaws.com"

  validation {
    condition     = length(var.aws_role_audience) > 0
    error_message = "aws_role_audience must not be empty."
  }
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (arn:aws:iam::ACCOUNT:oidc-provider/oidc.eks.REGION.amazonaws.com/id/ID), for IRSA and for the GCP workload identity provider \"eks\". null when the worker does not run on EKS."
  type        = string
  default     = null

  validation {
    condition     = var.eks_oidc_provider_arn == null || can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:oidc-provider/.+$", var.eks_oidc_provider_arn))
    error_message = "eks_oidc_provider_arn must be null or an IAM OIDC provider ARN."
  }
}

# ---------------------------------------------------------------------------------------------
# GCP
# ---------------------------------------------------------------------------------------------

variable "gcp_project_id" {
  description = "GCP project holding the buckets, Pub/Sub resources, service account and workload identity pool."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.gcp_project_id))
    error_message = "gcp_project_id must be a valid project id (6-30 lowercase letters, digits, hyphens)."
  }
}

variable "gcp_region" {
  description = "Default GCP region of the google provider."
  type        = string
  default     = "us-central1"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]$", var.gcp_region))
    error_message = "gcp_region must look like us-central1."
  }
}

variable "gcs_location" {
  description = "Location of the GCS buckets (a region, dual-region or multi-region such as US)."
  type        = string
  default     = "US"

  validation {
    condition     = length(var.gcs_location) > 0
    error_message = "gcs_location must not be empty."
  }
}

variable "gcs_source_buckets" {
  description = "Names of the GCS buckets the worker reads from (storage.objects.get). Created by this module."
  type        = list(string)

  validation {
    condition     = length(var.gcs_source_buckets) > 0 && alltrue([for b in var.gcs_source_buckets : can(regex("^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$", b))])
    error_message = "gcs_source_buckets needs at least one valid GCS bucket name."
  }
}

variable "gcs_destination_buckets" {
  description = "Names of the GCS buckets the worker writes to (storage.objects.create; storage.objects.get for the idempotency check; storage.objects.delete only with gcs_allow_overwrite). Created by this module."
  type        = list(string)

  validation {
    condition     = length(var.gcs_destination_buckets) > 0 && alltrue([for b in var.gcs_destination_buckets : can(regex("^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$", b))])
    error_message = "gcs_destination_buckets needs at least one valid GCS bucket name."
  }
}

variable "gcs_allow_overwrite" {
  description = "Grant storage.objects.delete on the GCS destination buckets (a custom role of that one permission). GCS requires it to replace an existing object, so without it an event whose destination already holds different content fails with access_denied (dead-lettered) although the worker's overwrite policy allows the replacement. The contract does not grant it; with versioning on, a replaced object stays recoverable as a non-current version."
  type        = bool
  default     = false
}

variable "gcs_noncurrent_version_retention_days" {
  description = "Days after which non-current object versions (left by overwrites) are deleted from the GCS buckets."
  type        = number
  default     = 30

  validation {
    condition     = var.gcs_noncurrent_version_retention_days >= 1
    error_message = "gcs_noncurrent_version_retention_days must be at least 1."
  }
}

variable "pubsub_topic_name" {
  description = "Pub/Sub topic producers publish transfer events to."
  type        = string
  default     = "transfer-events"

  validation {
    condition     = can(regex("^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$", var.pubsub_topic_name))
    error_message = "pubsub_topic_name must be a valid Pub/Sub topic id."
  }
}

variable "pubsub_subscription_name" {
  description = "Pub/Sub subscription the worker consumes (TRANSFER_WORKER_QUEUE=projects/P/subscriptions/S)."
  type        = string
  default     = "transfer-events"

  validation {
    condition     = can(regex("^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$", var.pubsub_subscription_name))
    error_message = "pubsub_subscription_name must be a valid Pub/Sub subscription id."
  }
}

variable "pubsub_dead_letter_topic_name" {
  description = "Pub/Sub dead-letter topic (TRANSFER_WORKER_DEAD_LETTER=projects/P/topics/T); Pub/Sub's own dead lettering publishes here too."
  type        = string
  default     = "transfer-events-dead-letter"

  validation {
    condition     = can(regex("^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$", var.pubsub_dead_letter_topic_name))
    error_message = "pubsub_dead_letter_topic_name must be a valid Pub/Sub topic id."
  }
}

variable "gcs_kms_key_name" {
  description = "Cloud KMS key (projects/P/locations/L/keyRings/R/cryptoKeys/K) the worker writes GCS destination objects with (--gcs-kms-key, CMEK). When set, the project's Cloud Storage service agent gets roles/cloudkms.cryptoKeyEncrypterDecrypter on this key only; null grants nothing."
  type        = string
  default     = null

  validation {
    condition     = var.gcs_kms_key_name == null || can(regex("^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$", var.gcs_kms_key_name))
    error_message = "gcs_kms_key_name must be null or projects/P/locations/L/keyRings/R/cryptoKeys/K."
  }
}

variable "gcp_service_account_id" {
  description = "Account id of the worker's Google service account (transfer-worker@PROJECT.iam.gserviceaccount.com)."
  type        = string
  default     = "transfer-worker"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.gcp_service_account_id))
    error_message = "gcp_service_account_id must be 6-30 lowercase letters, digits or hyphens."
  }
}

variable "workload_identity_pool_id" {
  description = "Id of the workload identity pool AWS identities are exchanged in (deploy/k8s/overlays/aws uses transfer-worker)."
  type        = string
  default     = "transfer-worker"

  validation {
    condition     = can(regex("^[a-z0-9-]{4,32}$", var.workload_identity_pool_id)) && !startswith(var.workload_identity_pool_id, "gcp-")
    error_message = "workload_identity_pool_id must be 4-32 lowercase letters, digits or hyphens, not starting with gcp-."
  }
}

variable "enable_gke_workload_identity" {
  description = "Bind the KSA worker_namespace/worker_service_account of the project's GKE clusters to the worker's Google service account (GKE Workload Identity)."
  type        = bool
  default     = false
}
