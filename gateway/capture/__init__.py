"""The bedside capture door: a web app (installable, offline-tolerant) that ward phones use instead of the camera
roll. It is served here and talks to the upload, patient, consent and photo-list APIs with the user's token; this
package serves its files, its picker lists and the dev-mode sign-in, nothing else."""
