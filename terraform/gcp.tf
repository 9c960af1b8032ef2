# GCP side: GCS buckets, Pub/Sub topic / subscription / dead-letter topic, the worker's service
# account with custom roles, and workload identity federation for the worker on AWS.

provider "google" {
  project = var.gcp_project_id
  region  = var.gcp_region

  default_labels = {
    app        = "transfer-worker"
    managed-by = "terraform"
  }
}

data "google_project" "current" {
  project_id = var.gcp_project_id
}

locals {
  # bucket name => role ("source" or "destination"); a bucket may not be both.
  gcs_buckets = merge(
    { for b in var.gcs_source_buckets : b => "source" },
    { for b in var.gcs_destination_buckets : b => "destination" },
  )

  pubsub_service_agent = "serviceAccount:service-${data.google_project.current.number}@gcp-sa-pubsub.iam.gserviceaccount.com"

  # Sessions of the worker role: arn:PARTITION:sts::ACCOUNT:assumed-role/ROLE/SESSION.
  worker_assumed_role_arn_prefix = "arn:${data.aws_partition.current.partition}:sts::${data.aws_caller_identity.current.account_id}:assumed-role/${aws_iam_role.worker.name}/"
}

check "gcs_buckets_distinct" {
  assert {
    condition     = length(setintersection(var.gcs_source_buckets, var.gcs_destination_buckets)) == 0
    error_message = "A bucket cannot be both a GCS source and a GCS destination here: the worker gets different rights on each."
  }
}

# ---------------------------------------------------------------------------------------------
# GCS buckets
# ---------------------------------------------------------------------------------------------

resource "google_storage_bucket" "transfer" {
  #checkov:skip=CKV_GCP_62:Usage/storage logs need a separate log bucket from the project's logging setup; Cloud Audit Logs (Data Access) are the recommended record of object access.
  for_each = local.gcs_buckets

  name                        = each.key
  project                     = var.gcp_project_id
  location                    = var.gcs_location
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  labels = {
    transfer-role = each.value
  }

  versioning {
    enabled = true
  }

  # XML-API multipart uploads left behind (the worker uses resumable uploads, which GCS expires
  # after a week by itself; this covers other writers of the bucket).
  lifecycle_rule {
    condition {
      age = var.abort_incomplete_multipart_upload_days
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.gcs_noncurrent_version_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }
}

# CMEK (--gcs-kms-key): GCS encrypts with the key as the project's Cloud Storage service agent,
# not as the worker, so the agent gets Encrypter/Decrypter on that one key, only when one is named.
data "google_storage_project_service_account" "gcs" {
  count   = var.gcs_kms_key_name == null ? 0 : 1
  project = var.gcp_project_id
}

resource "google_kms_crypto_key_iam_member" "gcs_service_agent" {
  count         = var.gcs_kms_key_name == null ? 0 : 1
  crypto_key_id = var.gcs_kms_key_name
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:${data.google_storage_project_service_account.gcs[0].email_address}"
}

# ---------------------------------------------------------------------------------------------
# Pub/Sub
# ---------------------------------------------------------------------------------------------

resource "google_pubsub_topic" "events" {
  #checkov:skip=CKV_GCP_83:Messages are encrypted with Google-managed keys; a CMEK needs a Cloud KMS key ring and key administration this module does not own.
  name    = var.pubsub_topic_name
  project = var.gcp_project_id
}

resource "google_pubsub_topic" "dead_letter" {
  #checkov:skip=CKV_GCP_83:Messages are encrypted with Google-managed keys; a CMEK needs a Cloud KMS key ring and key administration this module does not own.
  name    = var.pubsub_dead_letter_topic_name
  project = var.gcp_project_id
}

resource "google_pubsub_subscription" "events" {
  name    = var.pubsub_subscription_name
  project = var.gcp_project_id
  topic   = google_pubsub_topic.events.id

  # The worker extends the deadline every third of it while a transfer runs.
  ack_deadline_seconds       = var.visibility_timeout_seconds
  message_retention_duration = "604800s"

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.pubsub_max_delivery_attempts
  }

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  expiration_policy {
    ttl = "" # never expire for inactivity
  }
}

# A subscription on the dead-letter topic so dead letters are kept and can be inspected.
resource "google_pubsub_subscription" "dead_letter_inspect" {
  name    = "${var.pubsub_dead_letter_topic_name}-inspect"
  project = var.gcp_project_id
  topic   = google_pubsub_topic.dead_letter.id

  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"

  expiration_policy {
    ttl = ""
  }
}

# Pub/Sub's own dead lettering acts as the Pub/Sub service agent: it must be able to publish to
# the dead-letter topic and to acknowledge (subscriber) on the source subscription.
resource "google_pubsub_topic_iam_member" "dead_letter_service_agent" {
  project = var.gcp_project_id
  topic   = google_pubsub_topic.dead_letter.name
  role    = "roles/pubsub.publisher"
  member  = local.pubsub_service_agent
}

resource "google_pubsub_subscription_iam_member" "events_service_agent" {
  project      = var.gcp_project_id
  subscription = google_pubsub_subscription.events.name
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_service_agent
}

# ---------------------------------------------------------------------------------------------
# Worker service account and its permissions
# ---------------------------------------------------------------------------------------------

resource "google_service_account" "worker" {
  account_id   = var.gcp_service_account_id
  project      = var.gcp_project_id
  display_name = "transfer-worker"
  description  = "transfer-worker: GCS + Pub/Sub access; no keys, used through workload identity only."
}

# Three custom roles of one permission each, bound on buckets (never on the project):
#   reader      storage.objects.get     every bucket: sources are read; on destinations it is
#                                       the idempotency check (beyond the contract's list, which
#                                       names only create there; the worker cannot skip a
#                                       redelivered event without reading the destination).
#   writer      storage.objects.create  destination buckets.
#   overwriter  storage.objects.delete  destination buckets, only with var.gcs_allow_overwrite:
#                                       GCS requires it to replace an existing object.
resource "google_project_iam_custom_role" "reader" {
  project     = var.gcp_project_id
  role_id     = "transferWorkerObjectReader"
  title       = "transfer-worker object reader"
  description = "Read objects and their metadata: sources, and destinations for the idempotency check."
  permissions = ["storage.objects.get"]
}

resource "google_project_iam_custom_role" "writer" {
  project     = var.gcp_project_id
  role_id     = "transferWorkerObjectWriter"
  title       = "transfer-worker object writer"
  description = "Create objects in a transfer-worker destination bucket."
  permissions = ["storage.objects.create"]
}

resource "google_project_iam_custom_role" "overwriter" {
  count = var.gcs_allow_overwrite ? 1 : 0

  project     = var.gcp_project_id
  role_id     = "transferWorkerObjectOverwriter"
  title       = "transfer-worker object overwriter"
  description = "Replace existing objects in a transfer-worker destination bucket (GCS checks delete on overwrite)."
  permissions = ["storage.objects.delete"]
}

resource "google_storage_bucket_iam_member" "reader" {
  for_each = local.gcs_buckets

  bucket = google_storage_bucket.transfer[each.key].name
  role   = google_project_iam_custom_role.reader.id
  member = google_service_account.worker.member
}

resource "google_storage_bucket_iam_member" "writer" {
  for_each = toset(var.gcs_destination_buckets)

  bucket = google_storage_bucket.transfer[each.key].name
  role   = google_project_iam_custom_role.writer.id
  member = google_service_account.worker.member
}

resource "google_storage_bucket_iam_member" "overwriter" {
  for_each = var.gcs_allow_overwrite ? toset(var.gcs_destination_buckets) : toset([])

  bucket = google_storage_bucket.transfer[each.key].name
  role   = google_project_iam_custom_role.overwriter[0].id
  member = google_service_account.worker.member
}

resource "google_pubsub_subscription_iam_member" "worker" {
  project      = var.gcp_project_id
  subscription = google_pubsub_subscription.events.name
  role         = "roles/pubsub.subscriber"
  member       = google_service_account.worker.member
}

resource "google_pubsub_topic_iam_member" "worker_dead_letter" {
  project = var.gcp_project_id
  topic   = google_pubsub_topic.dead_letter.name
  role    = "roles/pubsub.publisher"
  member  = google_service_account.worker.member
}

# ---------------------------------------------------------------------------------------------
# Workload identity federation: the worker on AWS impersonates the service account
# ---------------------------------------------------------------------------------------------

resource "google_iam_workload_identity_pool" "worker" {
  project                   = var.gcp_project_id
  workload_identity_pool_id = var.workload_identity_pool_id
  display_name              = "transfer-worker"
  description               = "AWS identities of transfer-worker."
}

# AWS provider: AWS credentials of a session of the worker's IAM role (an EC2 instance profile, or
# AWS_* environment variables, which is where google-auth's AWS source looks), exchanged through
# a signed GetCallerIdentity request.
resource "google_iam_workload_identity_pool_provider" "aws" {
  #checkov:skip=CKV_GCP_125:GitHub Actions OIDC check; this is an AWS provider with no oidc block, which the check indexes and fails on (false positive); the attribute_condition below restricts it to the worker role.
  project                            = var.gcp_project_id
  workload_identity_pool_id          = google_iam_workload_identity_pool.worker.workload_identity_pool_id
  workload_identity_pool_provider_id = "aws"
  display_name                       = "AWS"
  description                        = "The transfer-worker IAM role of AWS account ${data.aws_caller_identity.current.account_id}."

  attribute_mapping = {
    "google.subject"     = "assertion.arn"
    "attribute.aws_role" = "assertion.arn.extract('assumed-role/{role}/')"
  }

  # Only sessions of the worker role (its assumed-role ARN, account and partition included) can
  # exchange tokens through this provider.
  attribute_condition = "assertion.arn.startsWith('${local.worker_assumed_role_arn_prefix}')"

  aws {
    account_id = data.aws_caller_identity.current.account_id
  }
}

resource "google_service_account_iam_member" "worker_aws_role" {
  service_account_id = google_service_account.worker.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "principalSet://iam.googleapis.com/${google_iam_workload_identity_pool.worker.name}/attribute.aws_role/${aws_iam_role.worker.name}"
}

# OIDC provider "eks": the EKS cluster's issuer, for the projected Kubernetes service account
# token the aws overlay of deploy/k8s mounts (google-auth's AWS source reads EC2 metadata, not
# IRSA). Created only when var.eks_oidc_provider_arn is set.
resource "google_iam_workload_identity_pool_provider" "eks" {
  count = var.eks_oidc_provider_arn == null ? 0 : 1

  project                            = var.gcp_project_id
  workload_identity_pool_id          = google_iam_workload_identity_pool.worker.workload_identity_pool_id
  workload_identity_pool_provider_id = "eks"
  display_name                       = "EKS"
  description                        = "Service account tokens of the EKS cluster running transfer-worker."

  attribute_mapping = {
    "google.subject" = "assertion.sub"
  }

  attribute_condition = "assertion.sub == '${local.eks_subject}'"

  oidc {
    issuer_uri = "https://${local.eks_oidc_issuer_hostpath}"
  }
}

resource "google_service_account_iam_member" "worker_eks" {
  count = var.eks_oidc_provider_arn == null ? 0 : 1

  service_account_id = google_service_account.worker.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "principal://iam.googleapis.com/${google_iam_workload_identity_pool.worker.name}/subject/${local.eks_subject}"
}

# GKE Workload Identity: the KSA transfer-worker/transfer-worker-sa acts as the service account.
resource "google_service_account_iam_member" "worker_gke" {
  count = var.enable_gke_workload_identity ? 1 : 0

  service_account_id = google_service_account.worker.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.gcp_project_id}.svc.id.goog[${var.worker_namespace}/${var.worker_service_account}]"
}
