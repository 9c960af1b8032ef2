# Provider versions are pinned: `~>` allows patch/minor updates inside the stated major line only.
# Commit the .terraform.lock.hcl that `terraform init` writes so every apply uses the same builds.
terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.80"
    }
    google = {
      source  = "hashicorp/google"
      version = "~> 6.10"
    }
  }
}
