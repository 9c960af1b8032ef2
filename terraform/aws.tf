# AWS side: S3 buckets, the SQS queue and its dead-letter queue, and the worker's IAM role.

provider "aws" {
  region = var.aws_region

  default_tags {
    tags = {
      "app.kubernetes.io/name" = "transfer-worker"
      managed-by               = "terraform"
    }
  }
}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  # bucket name => role ("source" or "destination"); a bucket may not be both.
  aws_buckets = merge(
    { for b in var.aws_source_buckets : b => "source" },
    { for b in var.aws_destination_buckets : b => "destination" },
  )

  aws_source_bucket_arns      = [for b in var.aws_source_buckets : "arn:${data.aws_partition.current.partition}:s3:::${b}"]
  aws_destination_bucket_arns = [for b in var.aws_destination_buckets : "arn:${data.aws_partition.current.partition}:s3:::${b}"]

  # "oidc.eks.REGION.amazonaws.com/id/ID", the prefix of the IRSA condition keys and the issuer.
  eks_oidc_issuer_hostpath = var.eks_oidc_provider_arn == null ? null : element(split("oidc-provider/", var.eks_oidc_provider_arn), 1)
  eks_subject              = "system:serviceaccount:${var.worker_namespace}:${var.worker_service_account}"
}

check "aws_buckets_distinct" {
  assert {
    condition     = length(setintersection(var.aws_source_buckets, var.aws_destination_buckets)) == 0
    error_message = "A bucket cannot be both an S3 source and an S3 destination here: the worker gets different rights on each."
  }
}

# ---------------------------------------------------------------------------------------------
# S3 buckets
# ---------------------------------------------------------------------------------------------

resource "aws_s3_bucket" "transfer" {
  #checkov:skip=CKV_AWS_18:Server access logging needs a separate log bucket owned by the account's logging setup; enable it there (CloudTrail data events cover object access).
  #checkov:skip=CKV_AWS_144:Cross-region replication is a data-residency/DR decision outside the worker; the source of truth for a transfer is the other cloud.
  #checkov:skip=CKV2_AWS_62:The worker is fed by its own queue, not by S3 event notifications; producers add notifications if they want them.
  for_each = local.aws_buckets

  bucket = each.key

  tags = {
    transfer-role = each.value
  }
}

resource "aws_s3_bucket_ownership_controls" "transfer" {
  for_each = aws_s3_bucket.transfer

  bucket = each.value.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "transfer" {
  for_each = aws_s3_bucket.transfer

  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "transfer" {
  for_each = aws_s3_bucket.transfer

  bucket = each.value.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "transfer" {
  for_each = aws_s3_bucket.transfer

  bucket = each.value.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = var.s3_sse_algorithm
    }
    bucket_key_enabled = var.s3_sse_algorithm == "aws:kms"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "transfer" {
  for_each = aws_s3_bucket.transfer

  bucket = each.value.id

  # A worker killed mid-transfer leaves a multipart upload behind; its parts are billed until
  # aborted. With var.s3_abort_orphan_uploads the next attempt aborts it; this rule always does.
  rule {
    id     = "abort-incomplete-multipart-upload"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_upload_days
    }
  }

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.s3_noncurrent_version_expiration_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.transfer]
}

data "aws_iam_policy_document" "bucket_tls_only" {
  for_each = aws_s3_bucket.transfer

  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      each.value.arn,
      "${each.value.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "transfer" {
  for_each = aws_s3_bucket.transfer

  bucket = each.value.id
  policy = data.aws_iam_policy_document.bucket_tls_only[each.key].json

  depends_on = [aws_s3_bucket_public_access_block.transfer]
}

# ---------------------------------------------------------------------------------------------
# SQS
# ---------------------------------------------------------------------------------------------

resource "aws_sqs_queue" "dead_letter" {
  name                      = var.sqs_dead_letter_queue_name
  message_retention_seconds = 1209600 # 14 days, the SQS maximum: time to inspect and redrive.
  sqs_managed_sse_enabled   = true
}

resource "aws_sqs_queue" "events" {
  name                       = var.sqs_queue_name
  visibility_timeout_seconds = var.visibility_timeout_seconds
  message_retention_seconds  = var.sqs_message_retention_seconds
  receive_wait_time_seconds  = 20 # long polling
  sqs_managed_sse_enabled    = true

  # After maxReceiveCount receives SQS moves the message to the DLQ itself (a worker that crashes
  # on a message never gets to dead-letter it). The worker dead-letters earlier on its own
  # (max retries 3: up to 4 attempts, each receive counted as one), so the count must stay
  # above 4 or SQS would move a message the worker still means to retry.
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dead_letter.arn
    maxReceiveCount     = var.sqs_max_receive_count
  })
}

resource "aws_sqs_queue_redrive_allow_policy" "dead_letter" {
  queue_url = aws_sqs_queue.dead_letter.id

  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.events.arn]
  })
}

data "aws_iam_policy_document" "queue_tls_only" {
  for_each = {
    events      = aws_sqs_queue.events.arn
    dead_letter = aws_sqs_queue.dead_letter.arn
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["sqs:*"]
    resources = [each.value]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_sqs_queue_policy" "events" {
  queue_url = aws_sqs_queue.events.id
  policy    = data.aws_iam_policy_document.queue_tls_only["events"].json
}

resource "aws_sqs_queue_policy" "dead_letter" {
  queue_url = aws_sqs_queue.dead_letter.id
  policy    = data.aws_iam_policy_document.queue_tls_only["dead_letter"].json
}

# ---------------------------------------------------------------------------------------------
# Worker IAM role: trusted through web identity only (no access keys)
# ---------------------------------------------------------------------------------------------

data "aws_iam_policy_document" "worker_trust" {
  # (a) EKS IRSA: the cluster's OIDC provider, for the worker's Kubernetes service account only.
  dynamic "statement" {
    for_each = var.eks_oidc_provider_arn == null ? [] : [var.eks_oidc_provider_arn]

    content {
      sid     = "EksServiceAccount"
      effect  = "Allow"
      actions = ["sts:AssumeRoleWithWebIdentity"]

      principals {
        type        = "Federated"
        identifiers = [statement.value]
      }

      condition {
        test     = "StringEquals"
        variable = "${local.eks_oidc_issuer_hostpath}:sub"
        values   = [local.eks_subject]
      }

      condition {
        test     = "StringEquals"
        variable = "${local.eks_oidc_issuer_hostpath}:aud"
        values   = ["sts.amazonaws.com"]
      }
    }
  }

  # (b) GKE: a Google-signed ID token of the worker's Google service account. For such tokens
  # accounts.google.com:aud and :sub are the service account's unique id and :oaud is the
  # audience the worker asked for (--aws-role-audience).
  statement {
    sid     = "GoogleServiceAccount"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = ["accounts.google.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "accounts.google.com:aud"
      values   = [google_service_account.worker.unique_id]
    }

    condition {
      test     = "StringEquals"
      variable = "accounts.google.com:sub"
      values   = [google_service_account.worker.unique_id]
    }

    condition {
      test     = "StringEquals"
      variable = "accounts.google.com:oaud"
      values   = [var.aws_role_audience]
    }
  }
}

resource "aws_iam_role" "worker" {
  name                 = var.aws_role_name
  description          = "transfer-worker: S3 + SQS access, assumed through web identity (EKS IRSA or Google service account)."
  assume_role_policy   = data.aws_iam_policy_document.worker_trust.json
  max_session_duration = 3600
}

# The contract's permissions, statement for statement; no wildcard actions, no s3:DeleteObject.
# s3:PutObject covers CreateMultipartUpload, UploadPart and CompleteMultipartUpload.
# Two statements go beyond the contract's list because the worker cannot keep its own promises
# without them (see terraform/README.md): DestinationObjectsHead and DestinationBucketsHead.
# Two more are opt-in (variables default to false): SourceBucketsList, DestinationUploadsList.
data "aws_iam_policy_document" "worker" {
  statement {
    sid       = "SourceObjectsRead"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = [for arn in local.aws_source_bucket_arns : "${arn}/*"]
  }

  statement {
    sid    = "DestinationObjectsWrite"
    effect = "Allow"
    actions = [
      "s3:PutObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [for arn in local.aws_destination_bucket_arns : "${arn}/*"]
  }

  statement {
    # Beyond the contract: HeadObject on the destination is the idempotency check (event id,
    # sha256 and event time live in the destination's metadata). HeadObject needs s3:GetObject.
    sid       = "DestinationObjectsHead"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = [for arn in local.aws_destination_bucket_arns : "${arn}/*"]
  }

  statement {
    # Beyond the contract: without s3:ListBucket S3 answers HeadObject of a key that does not
    # exist yet with 403, which the worker must treat as access_denied; with it, 404.
    sid       = "DestinationBucketsHead"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = local.aws_destination_bucket_arns
  }

  statement {
    sid    = "QueueConsume"
    effect = "Allow"
    actions = [
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueAttributes",
    ]
    resources = [aws_sqs_queue.events.arn]
  }

  # A shutdown hand-back (rollout, scale-in, drain timeout) re-sends the body with its delivery
  # and hand-back counts, then deletes the original, so hand-backs do not use up the event's
  # attempt budget or the redrive policy's maxReceiveCount (ADR.md 10). Without it the worker
  # falls back to visibility 0, and each hand-back counts as a failed attempt.
  statement {
    sid       = "QueueHandBack"
    effect    = "Allow"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.events.arn]
  }

  statement {
    sid       = "DeadLetterSend"
    effect    = "Allow"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.dead_letter.arn]
  }

  # The dead-letter queue's MaximumMessageSize, read once at the first dead letter: an envelope
  # is sent in the first form that fits it (a queue made since 2025 takes 1 MiB). Without it the
  # worker assumes 256 KiB and leaves out an error text a larger queue would have kept.
  statement {
    sid       = "DeadLetterLimit"
    effect    = "Allow"
    actions   = ["sqs:GetQueueAttributes"]
    resources = [aws_sqs_queue.dead_letter.arn]
  }

  # Opt-in: a missing source object is reported as source_not_found instead of access_denied.
  dynamic "statement" {
    for_each = var.s3_list_source_buckets ? ["SourceBucketsList"] : []

    content {
      sid       = statement.value
      effect    = "Allow"
      actions   = ["s3:ListBucket"]
      resources = local.aws_source_bucket_arns
    }
  }

  # Only when a key is configured: SSE-KMS writes with the customer managed key named in
  # --s3-kms-key-id (PutObject needs GenerateDataKey; multipart parts need Decrypt as well).
  dynamic "statement" {
    for_each = var.s3_kms_key_arn != null ? ["DestinationKmsKey"] : []

    content {
      sid       = statement.value
      effect    = "Allow"
      actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
      resources = [var.s3_kms_key_arn]
    }
  }

  # Opt-in: lets the next attempt find and abort a killed worker's orphan multipart upload of
  # the same key; without it the bucket lifecycle rule aborts it after N days.
  dynamic "statement" {
    for_each = var.s3_abort_orphan_uploads ? ["DestinationUploadsList"] : []

    content {
      sid       = statement.value
      effect    = "Allow"
      actions   = ["s3:ListBucketMultipartUploads"]
      resources = local.aws_destination_bucket_arns
    }
  }
}

resource "aws_iam_role_policy" "worker" {
  name   = "transfer-worker"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.worker.json
}
