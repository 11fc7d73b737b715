-- spec.runPolicy.suspend = false
if obj.spec.runPolicy == nil then
  obj.spec.runPolicy = {}
end
obj.spec.runPolicy.suspend = false
return obj
